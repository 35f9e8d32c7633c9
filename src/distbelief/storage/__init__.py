"""What a run keeps on disk: checkpoints (checkpoint), directory locks (dirlock) and the run
directory's log (runlog)."""
