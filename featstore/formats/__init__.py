"""On-disk formats shared by every writer and reader: keys, records, shards, per-image files, index, manifest."""
