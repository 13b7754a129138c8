// Package redirect owns the port redirect of FortiOS's ike-tcp-port: with
// ike-tcp-port P other than 4500, FortiOS's IKE daemon listens on TCP 4500
// and 11443, and connections to P reach 11443. iketcp's server listens on
// the same two ports; when it may (CAP_NET_ADMIN), Setup sends new TCP
// connections to P (Config.From) on the host's own addresses to iketcp's
// listener (Config.To), and Close, or Cleanup after a crash, takes that
// back.
//
// What it owns, in the network namespace it runs in:
//
//   - the nftables table "iketcp_redirect" ("iketcp_redirect_" and
//     Config.Name with a Name), family inet, with two NAT chains at
//     priority dstnat: prerouting, for connections from elsewhere, and
//     output, for those the host makes to itself (a local client, a
//     health check, a test). Each has one rule for IPv4 and one for IPv6
//     that changes the destination port of TCP to From, addressed to one
//     of the host's own addresses (fib daddr type local), to To;
//   - the abstract unix socket "@iketcp/nftables/" and the table's name,
//     bound while the Redirect runs: it tells a second instance of the
//     same Name that the table is in use, and a later run that a table
//     whose socket is free is stale.
//
// What it changes on the host: every new TCP connection to From on the
// host's own addresses, from anywhere, goes to To at the same address;
// conntrack turns the replies back, so the client sees the port it
// dialled and iketcp sees the client's own address and port. A service
// that listens on From on this host gets no new connections while the
// table is in; traffic the host forwards for others (routed, or to
// containers with addresses of their own) is not touched. Whatever
// filters the host's input sees the connections at To after the
// redirect: a firewall that lets only From in must let To in too (or
// accept "ct status dnat"). Another NAT of From at the same hook (a port
// that Docker or kube-proxy publishes on it) competes with this one, and
// the first to translate a connection wins: give From to one of them. A
// table of NAT chains also makes the kernel track connections in the
// namespace, if nothing did before.
//
// Clean-up: Close removes the table, then releases the socket; new
// connections to From are refused again. Connections it redirected end
// with it unless another NAT chain of their family stays hooked in the
// namespace (conntrack remembers their translation, but only a NAT hook
// applies it); iketcp's end with its listener anyway. A crashed
// run leaves its table, but its socket goes with its process: the next
// Setup of the Name removes the table first, and Cleanup removes it
// without setting up. One Name serves one running Redirect in a network
// namespace: while one runs, Setup and Cleanup of its Name, from this
// process or another, refuse with an error that matches ErrInUse and
// leave its table alone. Instances that redirect different ports need
// different Names. Any process of the namespace could bind the socket's
// address first and so hold the redirect off; the error says how to find
// it (ss -xap).
//
// A planned restart or upgrade of the server hands the redirect over
// without removing it: the old process sends a duplicate of the owner
// socket (OwnerFile) to the new one, which takes the running table over
// as it is (Adopt; it replaces the rules in place, in one transaction,
// only when this version's differ), and the old one then lets go without
// removing anything (Release). The socket stays bound throughout, so no
// third process sees the table as stale, and no connection to From is
// refused; Cleanup still refuses while either process holds it.
//
// When to use --redirect none instead, and map From to To on the
// platform: in a container (its network namespace is its own, and the
// platform maps ports anyway: docker run -p 443:11443, a Kubernetes
// Service with port 443 and targetPort 11443), behind a load balancer or
// a NAT that can send P to 11443, when the process may not have
// CAP_NET_ADMIN, or when another tool manages the host's nftables and
// would fight over the port. Then nothing of this package runs.
//
// Linux only: elsewhere Setup returns an error that matches
// nat.ErrNeedsLinux.
package redirect
