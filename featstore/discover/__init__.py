"""Where the records come from: annotation files and records, image references, the image scan, training samples."""
