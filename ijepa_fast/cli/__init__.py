"""Command lines: ijepa-pretrain, -demo, -bench, -eval, -export and -extract, the launch plan the
multi-node scripts print, and the options the commands share (``args``)."""
