"""Where the bytes live: a local folder or an fsspec URL (s3://...), behind one Storage interface."""
