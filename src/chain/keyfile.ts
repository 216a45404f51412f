/**
 * The .spk key file of an encrypted chain: a copy of what every image header carries (the
 * wrapped data key and the KDF parameters), so it can be re-created from any image and an
 * image can be opened when the key file is all that survives of the headers.
 */
import { readFile } from 'node:fs/promises';
import { CorruptImageError } from '../formats/errors.js';
import { writeFileAtomic } from './durable.js';
import type { EncryptionInfo } from './image/layout.js';

export async function writeKeyFile(path: string, chainId: Buffer, e: EncryptionInfo): Promise<void> {
  const doc = {
    format: 'imagekeep-key',
    version: 1,
    chainId: chainId.toString('hex'),
    kdf: { name: 'scrypt', log2N: e.kdf.log2N, r: e.kdf.r, p: e.kdf.p, salt: e.kdf.salt.toString('base64') },
    cipher: 'aes-256-gcm',
    wrappedKey: e.wrappedKey.toString('base64'),
  };
  await writeFileAtomic(path, Buffer.from(JSON.stringify(doc, null, 2) + '\n'));
}

export async function readKeyFile(path: string): Promise<{ chainId: Buffer; encryption: EncryptionInfo }> {
  try {
    const doc = JSON.parse(await readFile(path, 'utf8')) as {
      format: string; chainId: string; kdf: { log2N: number; r: number; p: number; salt: string }; wrappedKey: string;
    };
    if (doc.format !== 'imagekeep-key') throw new Error('format');
    return {
      chainId: Buffer.from(doc.chainId, 'hex'),
      encryption: { kdf: { log2N: doc.kdf.log2N, r: doc.kdf.r, p: doc.kdf.p, salt: Buffer.from(doc.kdf.salt, 'base64') }, wrappedKey: Buffer.from(doc.wrappedKey, 'base64') },
    };
  } catch {
    throw new CorruptImageError(`${path} is not a readable imagekeep key file`);
  }
}
