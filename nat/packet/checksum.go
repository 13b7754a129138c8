package packet

import (
	"encoding/binary"
	"math/bits"
)

// The Internet checksum (RFC 1071) is the one's complement of the one's
// complement sum of the data's 16-bit big-endian words. Two properties of
// that sum (RFC 1071 §2) make it cheap to compute here:
//
//   - One's complement addition is addition modulo 2^16-1, and 2^16 ≡ 1
//     modulo 2^16-1, so summing 64-bit words with end-around carry and
//     folding the result to 16 bits gives the same sum, four words at a
//     time.
//   - The sum is independent of byte order: summing the words as
//     little-endian gives the same sum with its two bytes swapped, so the
//     loop uses the machine's own loads and swaps once at the end.

// ChecksumAdd adds b to a running one's complement sum (start from 0)
// and returns the new sum; ChecksumFold turns it into the checksum. It is
// shared by every packet builder of iketcp's (UDP here, TCP in
// nat/faketcp). b must start at an even offset of the data being checksummed;
// an odd trailing byte is padded with zero, so only the last piece of that
// data may have an odd length.
func ChecksumAdd(sum uint64, b []byte) uint64 {
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
	// The last 0..7 bytes, zero-padded to a word.
	var tail uint64
	for i, c := range b {
		tail |= uint64(c) << (8 * i)
	}
	acc, carry = bits.Add64(acc, tail, carry)
	swapped := ChecksumFold(ChecksumAddWord(acc, carry))
	return ChecksumAddWord(sum, uint64(bits.ReverseBytes16(swapped)))
}

// ChecksumAddWord adds v to the running one's complement sum with
// end-around carry. A v below 2^16 counts as one 16-bit word.
func ChecksumAddWord(sum, v uint64) uint64 {
	sum, carry := bits.Add64(sum, v, 0)
	return sum + carry // cannot carry again: sum+v-2^64 < 2^64-1
}

// ChecksumFold folds a running sum to 16 bits. The checksum to send is its
// complement; data that includes a correct checksum folds to 0xffff.
func ChecksumFold(sum uint64) uint16 {
	sum = sum>>32 + sum&0xffffffff
	sum = sum>>32 + sum&0xffffffff
	sum = sum>>16 + sum&0xffff
	sum = sum>>16 + sum&0xffff
	return uint16(sum)
}
