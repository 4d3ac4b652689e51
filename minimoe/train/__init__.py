"""Training: what a run is asked to do (``config``: TrainConfig and the CLI/TOML merge), its data
(``data``), the routing statistics every policy decides from (``stats``), the loop (``trainer``), the run
directory that owns every file (``run_dir``) and the checkpoints it resumes from (``checkpoint``). The
policies that decide what trains and when it changes shape are ``minimoe.policies``."""
