/**
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of VHDX headers, region
 * tables and log entries. Node's zlib.crc32 is the IEEE polynomial and gives other values
 * ("123456789": IEEE cbf43926, Castagnoli e3069283). Only metadata is checksummed (4 KiB headers,
 * 64 KiB region tables, log entries of a few KiB), so a one-table byte loop is fast enough.
 */

const TABLE = new Uint32Array(256);
for (let i = 0; i < 256; i++) {
  let c = i;
  for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
  TABLE[i] = c >>> 0;
}

/**
 * CRC-32C of `data`; `skip` is the offset of a 4-byte checksum field inside `data` that is
 * counted as zeros (VHDX computes each checksum with its own field zeroed).
 */
export function crc32c(data: Uint8Array, skip = -1): number {
  const end = data.length;
  const hole = skip < 0 ? end : skip;
  let c = 0xffffffff;
  for (let i = 0; i < hole; i++) c = TABLE[(c ^ data[i]) & 0xff] ^ (c >>> 8);
  if (hole < end) {
    for (let i = 0; i < 4; i++) c = TABLE[c & 0xff] ^ (c >>> 8);
    for (let i = hole + 4; i < end; i++) c = TABLE[(c ^ data[i]) & 0xff] ^ (c >>> 8);
  }
  return (c ^ 0xffffffff) >>> 0;
}
