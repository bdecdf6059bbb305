"""Generated from protos/ by services.protogen; do not edit."""
