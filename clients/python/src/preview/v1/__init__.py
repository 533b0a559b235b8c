"""Generated from proto/preview/v1 by clients/generate.sh."""
