"""Storage: fixtures, checkpoints, images, shards and samples on disk, read and written safely."""
