"""The benchmark: registries, configs, jobs, runner, launchers, metrics, results and leaderboards."""
