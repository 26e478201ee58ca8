"""SageMaker packaging: the model tarball that the endpoint and batch transform run (model_code/ is its handler)."""
