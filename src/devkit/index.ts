/**
 * The fixture and demo disk generator: simulated source disks made with real tools, that
 * change between backups. See sim-disk.ts for the design and make-disk-cli.ts for the
 * command line the demo script uses.
 */
export { makeDisk, openDisk, diffManifests, SimDisk } from './sim-disk.js';
export type { MakeDiskOptions, MutateOptions, MutationReport, FillReport, Manifest, ManifestEntry, OpenDiskOptions } from './sim-disk.js';
export type { Layout, Partition, FsKind, Scheme, VolumeSpec } from './partition.js';
export type { MutationOp, MutationKind } from './tree.js';
export { Prng } from './prng.js';
export { DevkitError, DevkitUsageError, ToolFailedError } from './exec.js';
export { mountPoints } from './fuse-mount.js';
