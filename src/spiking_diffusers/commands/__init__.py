"""The ``sdm-*`` console commands, one module each; shared plumbing lives in ``spiking_diffusers.cli``."""
