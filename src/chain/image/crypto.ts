/**
 * Encryption of a chain: one random 256-bit data key per chain, wrapped with a key derived
 * from the password by scrypt and stored in every header (and the .spk file). Blocks are
 * sealed with AES-256-GCM under a sub-key, with a random 96-bit nonce per record and the
 * chain id + block number as associated data, so a record cannot be moved to another
 * block or chain unnoticed. Block digests become keyed (HMAC) so the index does not leak
 * which blocks hold known content.
 */
import { createCipheriv, createDecipheriv, createHmac, hash, hkdfSync, randomBytes, scrypt } from 'node:crypto';
import { promisify } from 'node:util';
import { WrongPasswordError } from '../../formats/errors.js';
import { DIGEST_SIZE, type EncryptionInfo, type KdfParams } from './layout.js';

const scryptAsync = promisify(scrypt) as (pw: Buffer, salt: Buffer, len: number, opts: object) => Promise<Buffer>;

export const NONCE_SIZE = 12;
export const TAG_SIZE = 16;
/** Bytes an encrypted record adds to its payload. */
export const SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE;

/** The keys every block operation needs; passed to workers as raw bytes. */
export interface ChainKeys {
  chainId: Buffer;
  blockKey: Buffer;
  digestKey: Buffer;
}

// 2^15 × 8 × 128 B = 32 MiB and ~100 ms per derivation: the cost of one password check.
const DEFAULT_KDF = { log2N: 15, r: 8, p: 1 };

async function deriveKek(password: Buffer, kdf: KdfParams): Promise<Buffer> {
  const N = 2 ** kdf.log2N;
  return scryptAsync(password, kdf.salt, 32, { N, r: kdf.r, p: kdf.p, maxmem: 256 * N * kdf.r + 2 ** 20 });
}

function subKeys(chainId: Buffer, dataKey: Buffer): ChainKeys {
  const derive = (info: string) => Buffer.from(hkdfSync('sha256', dataKey, chainId, info, 32));
  return { chainId, blockKey: derive('imagekeep block seal v1'), digestKey: derive('imagekeep block digest v1') };
}

/** A new data key for a new chain, wrapped under the password. */
export async function createChainKey(password: Buffer, chainId: Buffer): Promise<{ info: EncryptionInfo; keys: ChainKeys }> {
  const kdf: KdfParams = { ...DEFAULT_KDF, salt: randomBytes(32) };
  const dataKey = randomBytes(32);
  const kek = await deriveKek(password, kdf);
  const nonce = randomBytes(NONCE_SIZE);
  const c = createCipheriv('aes-256-gcm', kek, nonce);
  c.setAAD(chainId);
  const wrapped = Buffer.concat([nonce, c.update(dataKey), c.final(), c.getAuthTag()]);
  return { info: { kdf, wrappedKey: wrapped }, keys: subKeys(chainId, dataKey) };
}

/** Unwraps the chain's data key; a wrong password fails the GCM tag check. */
export async function openChainKey(password: Buffer, chainId: Buffer, info: EncryptionInfo, where: string): Promise<ChainKeys> {
  const kek = await deriveKek(password, info.kdf);
  const w = info.wrappedKey;
  const d = createDecipheriv('aes-256-gcm', kek, w.subarray(0, NONCE_SIZE));
  d.setAAD(chainId);
  d.setAuthTag(w.subarray(NONCE_SIZE + 32, NONCE_SIZE + 32 + TAG_SIZE));
  try {
    return subKeys(chainId, Buffer.concat([d.update(w.subarray(NONCE_SIZE, NONCE_SIZE + 32)), d.final()]));
  } catch {
    throw new WrongPasswordError(`wrong password for ${where}: the chain's key could not be unwrapped; check --password-file`);
  }
}

function aad(keys: ChainKeys, block: number): Buffer {
  const b = Buffer.alloc(24);
  keys.chainId.copy(b, 0);
  b.writeDoubleLE(block, 16);
  return b;
}

/** nonce ‖ ciphertext ‖ tag */
export function sealBlock(keys: ChainKeys, block: number, payload: Uint8Array): Buffer {
  const nonce = randomBytes(NONCE_SIZE);
  const c = createCipheriv('aes-256-gcm', keys.blockKey, nonce);
  c.setAAD(aad(keys, block));
  return Buffer.concat([nonce, c.update(payload), c.final(), c.getAuthTag()]);
}

/** Returns null when the record fails authentication. */
export function openBlock(keys: ChainKeys, block: number, record: Uint8Array): Buffer | null {
  if (record.length < SEAL_OVERHEAD) return null;
  const d = createDecipheriv('aes-256-gcm', keys.blockKey, record.subarray(0, NONCE_SIZE));
  d.setAAD(aad(keys, block));
  d.setAuthTag(record.subarray(record.length - TAG_SIZE));
  try {
    return Buffer.concat([d.update(record.subarray(NONCE_SIZE, record.length - TAG_SIZE)), d.final()]);
  } catch {
    return null;
  }
}

/**
 * The digest stored per block: SHA-256 (keyed with HMAC when encrypted), first 16 bytes.
 * Unkeyed, the one-shot `crypto.hash` saves a Hash object per block (64 KiB blocks: about
 * 5% of the hashing time).
 */
export function blockDigest(data: Uint8Array, digestKey: Buffer | null): Buffer {
  const full = digestKey ? createHmac('sha256', digestKey).update(data).digest() : hash('sha256', data, 'buffer');
  return full.subarray(0, DIGEST_SIZE);
}

/** True when `data` has the stored `digest` (DIGEST_SIZE bytes). */
export function blockDigestMatches(data: Uint8Array, digestKey: Buffer | null, digest: Uint8Array): boolean {
  return blockDigest(data, digestKey).equals(digest);
}
