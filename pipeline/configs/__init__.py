"""The stage configs, in torch-free modules: the CLI, the job parser and `import enspipe` read
every option, default and check without importing torch. Each stage module re-exports its
config (`enspipe.train.TrainConfig` is `enspipe.configs.train.TrainConfig`).

    fields      the field groups every stage shares (data, weights, device, eps)
    train       TrainConfig
    evaluate    EvalConfig
    diagnose    DiagnoseConfig
(PrecomputeConfig lives in `enspipe.precompute.config`, torch-free as well.)
"""
