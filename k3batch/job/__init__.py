"""Running a job: the job-kind registry (`kinds`), pre-flight checks (`preflight`,
`inputs`), the actor pools (`pools`), the run itself (`run`; Ray starts in
`k3batch.ray_start`), how an image-making kind runs its dataset (`execute`), accounting
(`accounting`) and failure diagnosis (`failures`)."""
