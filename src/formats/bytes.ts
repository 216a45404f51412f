/** Small arithmetic and byte helpers shared by the disk codecs. */

export const SECTOR = 512;

export function ceilDiv(a: number, b: number): number {
  return Math.floor((a + b - 1) / b);
}

export function alignUp(n: number, to: number): number {
  return ceilDiv(n, to) * to;
}

/** True when every byte is zero; compares eight bytes at a time where alignment allows. */
export function isAllZero(buf: Uint8Array): boolean {
  const words = buf.byteOffset % 8 === 0 ? Math.floor(buf.length / 8) : 0;
  if (words > 0) {
    const w = new BigUint64Array(buf.buffer, buf.byteOffset, words);
    for (let i = 0; i < words; i++) if (w[i] !== 0n) return false;
  }
  for (let i = words * 8; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}
