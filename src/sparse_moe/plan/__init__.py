"""``sparse-moe-plan``: what one rank of a training run holds, before anything is built.

``planner.plan_run`` makes the plan; ``memory.py`` and ``activations.py`` count its parts;
``cli.py`` is the command line. Nothing is imported here, so that the command can keep
DeepSpeed's start-up messages off its standard output.
"""
