"""Running a job: the job-kind registry (`kinds`), pre-flight checks (`preflight`,
`inputs`), local Ray start-up (`local_ray`), the actor pools (`pools`), the run itself
(`run`), accounting (`accounting`) and failure diagnosis (`failures`)."""
