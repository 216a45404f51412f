// The test sshd lives in src/devkit (benchmarks use it too).
export * from '../../src/devkit/sshd.js';
