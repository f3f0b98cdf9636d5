"""`python -m lpconvert …` (the form torchrun uses: torchrun --nproc_per_node N -m lpconvert finetune …)."""

from .cli import main

main(prog_name="lpconvert")
