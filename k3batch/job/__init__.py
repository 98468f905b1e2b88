"""Running a job: the job-kind registry (`kinds`), pre-flight checks (`preflight`,
`inputs`), local Ray start-up (`local_ray`), the actor pools (`pools`), the run itself
(`run`), how an image-making kind runs its dataset (`execute`), accounting (`accounting`) and
failure diagnosis (`failures`)."""
