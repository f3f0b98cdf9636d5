"""`python -m lpconvert …` (the form torchrun uses: torchrun --nproc_per_node N -m lpconvert finetune …)."""

from lpconvert.cli import main

main(prog_name="lpconvert")
