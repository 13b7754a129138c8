# iketcp as a container image: one static binary (CGO_ENABLED=0) in an
# otherwise empty image, run as an unprivileged user.
#
#   docker build -t iketcp .          builds the binary from source in the golang image
#   make image                        the same with podman, from a binary built on this host
#                                     (--build-arg BINARY_FROM=context: bin/image/ holds it)
#
# The entrypoint is iketcp; the command is the role and its flags:
#   podman run -p 4500:4500 iketcp server --backend 192.0.2.10:4500
# Every flag is also an IKETCP_* variable. The control socket is at
# /run/iketcp/iketcp/control.sock (IKETCP_CONTROL), so `iketcp status` in the
# container finds it: kubectl exec POD -c iketcp -- /iketcp status
#
# The user (65532) needs no capability for RFC 9329 on a port from 1024
# up. Transparent mode (--tun) and fake-TCP need CAP_NET_ADMIN and
# /dev/net/tun: run those as user 0 with only NET_ADMIN added (see
# deploy/kubernetes/README.md).

ARG BINARY_FROM=source

FROM docker.io/library/golang:1.26-bookworm AS source
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/iketcp ./cmd/iketcp \
 && mkdir -p /out/run/iketcp && chmod 1777 /out/run/iketcp

# The same tree from the build context: bin/image/iketcp and
# bin/image/run/iketcp, as `make image-context` leaves them.
FROM scratch AS context
COPY bin/image/ /out/

FROM ${BINARY_FROM} AS binary

FROM scratch
COPY --from=binary /out/ /
USER 65532:65532
ENV IKETCP_CONTROL=/run/iketcp/iketcp/control.sock
EXPOSE 4500/tcp
ENTRYPOINT ["/iketcp"]
CMD ["server"]
