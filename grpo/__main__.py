"""`python -m grpo fit|validate|test -c configs/x.yaml [--model.init_args.beta 0.1 ...]`.

One config surface: the typed constructor arguments of the module (`model:`) and of
`QADataModule` (`data:`), plus Lightning's Trainer (`trainer:`).
"""
from grpo.cli import main

if __name__ == "__main__":
    main()
