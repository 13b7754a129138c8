package faketcp

import (
	"encoding/binary"
	"math/bits"
)

// The Internet checksum (RFC 1071), computed as package packet does: the
// one's complement sum is taken 64 bits at a time with end-around carry
// (2^16 ≡ 1 modulo 2^16-1, so wider words fold to the same sum), in the
// machine's own byte order, and swapped once at the end (the sum does not
// depend on byte order beyond that swap).

// checksumAdd adds b to the running one's complement sum and returns the
// new sum. b must start at an even offset of the data being checksummed;
// an odd trailing byte is padded with zero, so only the last piece of that
// data may have an odd length.
func checksumAdd(sum uint64, b []byte) uint64 {
	var acc, carry uint64
	for len(b) >= 64 {
		acc, carry = bits.Add64(acc, binary.LittleEndian.Uint64(b[0:8]), carry)
		acc, carry = bits.Add64(acc, binary.LittleEndian.Uint64(b[8:16]), carry)
		acc, carry = bits.Add64(acc, binary.LittleEndian.Uint64(b[16:24]), carry)
		acc, carry = bits.Add64(acc, binary.LittleEndian.Uint64(b[24:32]), carry)
		acc, carry = bits.Add64(acc, binary.LittleEndian.Uint64(b[32:40]), carry)
		acc, carry = bits.Add64(acc, binary.LittleEndian.Uint64(b[40:48]), carry)
		acc, carry = bits.Add64(acc, binary.LittleEndian.Uint64(b[48:56]), carry)
		acc, carry = bits.Add64(acc, binary.LittleEndian.Uint64(b[56:64]), carry)
		b = b[64:]
	}
	for len(b) >= 8 {
		acc, carry = bits.Add64(acc, binary.LittleEndian.Uint64(b), carry)
		b = b[8:]
	}
	var tail uint64
	for i, c := range b {
		tail |= uint64(c) << (8 * i)
	}
	acc, carry = bits.Add64(acc, tail, carry)
	swapped := checksumFold(checksumAddWord(acc, carry))
	return checksumAddWord(sum, uint64(bits.ReverseBytes16(swapped)))
}

// checksumAddWord adds v to the running sum with end-around carry. A v
// below 2^16 counts as one 16-bit word.
func checksumAddWord(sum, v uint64) uint64 {
	sum, carry := bits.Add64(sum, v, 0)
	return sum + carry
}

// checksumFold folds a running sum to 16 bits. The checksum to send is its
// complement; data that includes a correct checksum folds to 0xffff.
func checksumFold(sum uint64) uint16 {
	sum = sum>>32 + sum&0xffffffff
	sum = sum>>32 + sum&0xffffffff
	sum = sum>>16 + sum&0xffff
	sum = sum>>16 + sum&0xffff
	return uint16(sum)
}
