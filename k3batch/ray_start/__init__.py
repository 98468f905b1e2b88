"""Ray start-up for `k3batch run`, `k3batch serve` and `k3batch submit`: one rule for all three.

- No address (none given and no RAY_ADDRESS): a fresh local Ray of the command's own, never
  a cluster the machine has recorded (a `ray start` that died leaves its address behind).
- An address: join it, or fail within seconds with one line naming where the address came
  from and the address (exit code 2), never a wait on Ray's retries.

`connect`: the rule itself, and the Jobs API client of `submit`. `budget`: the CPUs and GPUs
a job's actor pools or a Serve config's deployments ask for, against what Ray has. `jobs`:
Ray for a batch job (the rule, the budget, and Ray Data's console). Light at import: Ray is
imported inside the functions that start it.
"""
