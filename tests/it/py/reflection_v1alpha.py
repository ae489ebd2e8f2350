"""Lists a node's services with Python's stock gRPC reflection client (grpcio-reflection),
which speaks grpc.reflection.v1alpha only, over TLS trusting the cluster CA.

usage: reflection_v1alpha.py HOST:PORT CA_PEM_PATH
Prints one service per line, then each method of flotilla.v1.AgentService as
"method NAME", resolved through the reflected file descriptors.
"""

import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> None:
    target, ca_path = sys.argv[1], sys.argv[2]
    with open(ca_path, "rb") as ca_file:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_file.read())
    with grpc.secure_channel(target, credentials) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        database = ProtoReflectionDescriptorDatabase(channel)
        for service in database.get_services():
            print(service)
        pool = DescriptorPool(database)
        agent_service = pool.FindServiceByName("flotilla.v1.AgentService")
        for method in agent_service.methods:
            print(f"method {method.name}")


if __name__ == "__main__":
    main()
