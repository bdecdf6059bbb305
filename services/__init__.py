"""What every stagemesh stage shares: config, etcd membership, the gRPC server runtime,
metrics, logging, the stage clients and the generated protobuf code (``services.pb``)."""

__version__ = "0.1.0"
