"""The names of the public API (`resnet_jax.__all__`), kept apart so that `import resnet_jax` can list
them without importing JAX; `resnet_jax.api` defines or imports each of them."""

NAMES = (
    # models and weights
    "Model", "load_model", "create_model", "convert_weights", "MODEL_NAMES",
    # data
    "Dataset", "load_data", "dataset_from_arrays",
    # per-example gradients and Grad-CAM
    "Gradients", "per_example_grads", "GradCAM", "GradCAMPlusPlus",
    # representations and the draft's analyses, on arrays
    "Representations", "cosine_summaries", "cluster_spaces", "misclassification_report", "similarity_table",
    # label errors, wrong predictions and attribution, on arrays
    "LabelIssues", "label_issues", "ErrorScores", "error_scores", "Proponents", "influence", "top_proponents",
    # jobs on a run or a data set (what the command line runs)
    "TrainConfig", "train", "run_extract", "load_store", "run_gradcam", "audit", "run_audit", "Explanation",
    "explain", "run_explain",
    "curvature", "reproduce",
    # the error every check raises
    "UserError",
)
