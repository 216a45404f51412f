// The command without tap's process hook: what helpers/cli.ts now does for every test.
export { imagekeep as imagekeepPlain, runNode } from './cli.js';
