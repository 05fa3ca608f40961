"""GPUs beside training: the timeline format, live NVML, replay, the sampler thread and the diagnosis."""
