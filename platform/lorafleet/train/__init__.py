"""Training on Ray Train: the driver recipe and everything a worker runs.

    context.py     RunContext: the config, task, labels, data splits and run place, built once per run
    recipe.py      finetune(): config -> data -> Ray Train -> test metrics -> registry (the driver)
    worker.py      train_loop_per_worker and the TorchTrainer that runs it
    dataset.py     padded rows into Ray Data, the per-batch collate, the learning-rate schedule
    steps.py       model build, DDP/FSDP wrap, optimizer steps with gradient accumulation
    checkpoint.py  what a checkpoint holds; validation scoring at each checkpoint
    precision.py   fp32 master weights, autocast, loss scaling
    methods.py     full / partial / lora / head: what is trainable
    feature.py     the feature-based baseline (no torch training)
    results.py     RunSummary, scoring a saved model, the registry metadata, registering
    memory.py      the memory planner's formulas: parameters counted on the meta device, bytes per rank
    plan.py        a worker's plan checked against a cluster, the fixes, PlanError, the pre-flight check
    plan_serve.py  a vLLM engine replica's memory; plan_table.py: what fits where
    clusters.py    node types from cluster.yaml, KubeRay manifests, --gpus, the running Ray; placement

Import the submodules directly (`from lorafleet.train.recipe import finetune`): this package's
`__init__` imports nothing, so `lorafleet.evaluate` can use `train.methods` without pulling in the
recipe (which itself scores through `lorafleet.evaluate`).
"""
