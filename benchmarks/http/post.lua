-- The HTTP benchmark's request: a 4 KiB POST, like a Prometheus remote-write push.
-- wrk -t2 -c32 -d6s --latency -s benchmarks/http/post.lua http://127.0.0.1:PORT/api/v1/push
wrk.method = "POST"
wrk.body = string.rep("x", 4096)
wrk.headers["Content-Type"] = "application/x-protobuf"
