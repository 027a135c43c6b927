"""Safe loading of pickled inputs: nothing in a checkpoint is ever executed."""
