/**
 * File names of a chain (SPEC §2): C_VOL-b002.spf, C_VOL-b002-i633.spi, and collapsed
 * files named after the last point they include, C_VOL-b002-i630-cd.spi,
 * -cd-cw, -cd-cm, -cd-cw-cm, -cd-cm-cr, -cd-cw-cm-cr. Numbers have at least three digits
 * and grow past 999.
 */
import { LEVEL_BITS } from './image/layout.js';

export interface ImageName {
  volume: string;
  base: number;
  /** incremental number of the last point included; 0 for a base */
  last: number;
  /** collapse suffix bits (LEVEL_BITS); 0 for a base or a raw incremental */
  levelBits: number;
}

const NAME = /^(.+)-b(\d{3,})(?:-i(\d{3,})((?:-c[dwmr])*))?\.(spf|spi)$/;
const SUFFIX_ORDER = ['cd', 'cw', 'cm', 'cr'] as const;

function pad(n: number): string {
  return String(n).padStart(3, '0');
}

export function suffixOf(levelBits: number): string {
  return SUFFIX_ORDER.filter((s) => levelBits & LEVEL_BITS[s]).map((s) => `-${s}`).join('');
}

/** Rank for "the higher level wins": raw 0, -cd 1, -cw 2, -cm 3, -cr 4. */
export function levelRank(levelBits: number): number {
  if (levelBits & LEVEL_BITS.cr) return 4;
  if (levelBits & LEVEL_BITS.cm) return 3;
  if (levelBits & LEVEL_BITS.cw) return 2;
  if (levelBits & LEVEL_BITS.cd) return 1;
  return 0;
}

export function levelName(levelBits: number, isBase: boolean): string {
  if (isBase) return 'base';
  return ['incremental', 'daily', 'weekly', 'monthly', 'rolling'][levelRank(levelBits)]!;
}

/** A valid suffix: starts with -cd; -cr only after -cm; in the fixed order. */
function validSuffixBits(suffix: string): number | null {
  const parts = suffix.split('-').filter(Boolean);
  let bits = 0;
  let lastRank = -1;
  for (const p of parts) {
    const rank = SUFFIX_ORDER.indexOf(p as (typeof SUFFIX_ORDER)[number]);
    if (rank <= lastRank) return null;
    lastRank = rank;
    bits |= LEVEL_BITS[p as (typeof SUFFIX_ORDER)[number]];
  }
  if (bits === 0) return 0;
  if (!(bits & LEVEL_BITS.cd)) return null;
  if (bits & LEVEL_BITS.cr && !(bits & LEVEL_BITS.cm)) return null;
  return bits;
}

export function parseImageName(fileName: string): ImageName | null {
  const m = NAME.exec(fileName);
  if (!m) return null;
  const [, volume, base, inc, suffix = '', ext] = m;
  const isBase = inc === undefined;
  if (isBase !== (ext === 'spf')) return null;
  const levelBits = validSuffixBits(suffix);
  if (levelBits === null) return null;
  const last = isBase ? 0 : Number(inc);
  if (!isBase && last < 1) return null;
  return { volume: volume!, base: Number(base), last, levelBits };
}

export function formatImageName(n: ImageName): string {
  if (n.last === 0) return `${n.volume}-b${pad(n.base)}.spf`;
  return `${n.volume}-b${pad(n.base)}-i${pad(n.last)}${suffixOf(n.levelBits)}.spi`;
}

/** Files named like images (ours or ShadowProtect's, which share the pattern). */
export function looksLikeImageName(fileName: string): boolean {
  return /\.(spf|spi)$/i.test(fileName);
}

export function chainKey(volume: string, base: number): string {
  return `${volume}-b${pad(base)}`;
}

export function keyFilePath(dir: string, volume: string, base: number): string {
  return `${dir}/${chainKey(volume, base)}.spk`;
}

export function badLogPath(dir: string, volume: string, base: number): string {
  return `${dir}/${chainKey(volume, base)}.bad.log`;
}

/** Volume names become part of file names: keep them to safe characters. */
export function validVolumeName(v: string): boolean {
  return /^[A-Za-z0-9_][A-Za-z0-9_.]{0,63}$/.test(v);
}
