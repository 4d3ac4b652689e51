"""Training: what a run is asked to do (``config``: TrainConfig and the CLI/TOML merge), the loop
(``trainer``), the run directory that owns every file (``run_dir``), the checkpoints it resumes from
(``checkpoint``) and the papers' settings by name (``recipes``). The policies that decide what trains and when it
changes shape are ``minimoe.policies``, the data ``minimoe.data``, several processes ``minimoe.parallel``; the
``minimoe train`` command is ``minimoe.cli.train``."""
