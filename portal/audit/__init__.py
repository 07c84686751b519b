"""The audit trail: its actions (:mod:`.actions`), the hash chain every service appends to in its own transaction
(:mod:`.record`), verification (:mod:`.verify`) against the signed checkpoints kept outside the database
(:mod:`.checkpoints`, signed with :mod:`.signing`'s key), and verifiable exports (:mod:`.export`)."""
