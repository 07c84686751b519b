"""Edge packages: a version's proven ONNX form (and an int8 form where it stays accurate), a small runner and a
signed manifest, built by a worker for devices that predict offline and upload their predictions later."""
