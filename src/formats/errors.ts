/**
 * One error class per failure kind. Each carries a stable `code`, the numbers that
 * explain it, and a message that says what is wrong and what to do. Only the CLI turns
 * these into exit codes.
 */

export class ImagekeepError extends Error {
  readonly code: string;
  readonly details: Record<string, unknown>;
  constructor(code: string, message: string, details: Record<string, unknown> = {}) {
    super(message);
    this.name = new.target.name;
    this.code = code;
    this.details = details;
  }
}

/** An image whose bytes are not what our format promises (truncated, bit-flipped, bad index). */
export class CorruptImageError extends ImagekeepError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('CORRUPT_IMAGE', message, details);
  }
}

/** A file that is not one of ours (no magic), including other vendors' images. */
export class ForeignFormatError extends ImagekeepError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('FOREIGN_FORMAT', message, details);
  }
}

/** A file written by a newer imagekeep than this one understands. */
export class UnsupportedVersionError extends ImagekeepError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('UNSUPPORTED_VERSION', message, details);
  }
}

/** A dependency path that cannot be followed: missing parent, ids that do not link. */
export class ChainBrokenError extends ImagekeepError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('CHAIN_BROKEN', message, details);
  }
}

export class WrongPasswordError extends ImagekeepError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('WRONG_PASSWORD', message, details);
  }
}

/** A request the caller can fix: bad arguments, a refused operation, a busy folder. */
export class UsageError extends ImagekeepError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('USAGE', message, details);
  }
}

/** The operation was refused because of the state of the world (mounted target, bad file on path, lock held). */
export class RefusedError extends ImagekeepError {
  constructor(code: string, message: string, details: Record<string, unknown> = {}) {
    super(code, message, details);
  }
}

/** The fault-injection switch fired (tests only): the process must die as if killed. */
export class InjectedCrash extends Error {
  constructor(step: number, what: string) {
    super(`injected crash at durable step ${step} (${what})`);
    this.name = 'InjectedCrash';
  }
}
