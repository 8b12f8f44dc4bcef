"""subdisc's workers: image loading, the dlib embedding pipeline, the Redis cache, and RQ jobs."""
