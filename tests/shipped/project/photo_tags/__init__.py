"""photo_tags: tag photos from a CLIP image embedding plus the photo's source and scene."""
