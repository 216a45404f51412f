/**
 * Errors of the filesystem allocation readers. Both mean "claim nothing free here": the
 * backup then stores the volume's blocks as they are, so a parser's doubt never loses data.
 */
import { ImagekeepError } from '../errors.js';

/** Filesystem metadata that contradicts itself or the device (torn record, bitmap past the end). */
export class CorruptFilesystemError extends ImagekeepError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('CORRUPT_FILESYSTEM', message, details);
  }
}

/**
 * A filesystem in a state or with a feature whose free space we cannot read safely
 * (journal needing recovery, META_BG, bigalloc, an NTFS volume marked dirty).
 */
export class UnsupportedFilesystemError extends ImagekeepError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('UNSUPPORTED_FILESYSTEM', message, details);
  }
}
