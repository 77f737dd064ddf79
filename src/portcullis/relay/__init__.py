"""The relay role (double hop): in the second DMZ, it connects inward for the edge gateway,
to the destinations its own allow-list names and nowhere else."""
