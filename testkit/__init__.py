"""Tools shared by the test suite and the benchmarks: free ports, redis-server processes and a
Redis Cluster, a fake server speaking OpenAI's streaming protocol, and a Server-Sent Events
parser. Nothing here is part of the service."""
