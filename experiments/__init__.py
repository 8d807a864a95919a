"""Experiments that run the model and write numbers: `measure_memory.py` (which capitals and continents
the base model answers closed-book: the MEMORY/LOOKUP split of the offline task) and `eval_cold_start.py`
(does an SFT adapter keep that knowledge, per kind). Commands: `python -m experiments.<name>`."""
