"""Generation jobs that write images to disk: one job (prompts -> plan -> streaming core -> sink), its two sinks
(a folder of PNGs, webdataset shards), prompt files and Ray replicas."""
