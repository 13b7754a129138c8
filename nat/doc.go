// Package nat is the home of everything in iketcp that fools or survives
// the network between the IKE daemons. The package itself holds only what
// its modes share and their users see: the errors that say a mode cannot
// run here (ErrNeedsNetAdmin, ErrNeedsLinux). The work is in its
// packages:
//
//   - nat/intercept: transparent mode. A TUN device, and policy rules
//     that move the unchanged daemon's IKE and ESP to its peers into it;
//     their clean-up.
//   - nat/fakenet: fake-TCP mode's network plumbing. A TUN device for the
//     userspace TCP endpoint, the nftables NAT and forwarding that connect
//     it to the network; their clean-up.
//   - nat/faketcp: fake-TCP mode's endpoint, a userspace TCP stack that
//     carries each datagram in a segment of its own over a tun.Device.
//   - nat/tun: the one packet-device interface, tun.Device, and the Linux
//     TUN device that both modes create and remove.
//   - nat/redirect: the server's ike-tcp-port, FortiOS's way: an nftables
//     table that sends the chosen port to iketcp's 11443.
//   - nat/realaddr: real-address mode: transparent sockets that carry a
//     client's own address toward the gateway's daemon, and the policy
//     routing and nftables marks that bring its replies back.
//   - nat/packet: the IP packet codec of transparent mode.
//   - nat/internal/setup: what every setup of the modes does the same
//     way: its errors, the capability check, undoing a failed setup.
//
// For tests only: nat/tun/tuntest (in-memory devices) and nat/nattest
// (network namespaces and what tests build in them).
package nat
