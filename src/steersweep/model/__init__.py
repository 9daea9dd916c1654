"""Stage 5, the model on the machine: dtype choice (dtypes), finding its checkpoint and config
(checkpoint), the device map within a memory budget (placement), loading it (loading), memory
accounting and OOM back-off (memory), and the embedded default model (embedded)."""
