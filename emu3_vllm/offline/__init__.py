"""The user's process: the offline API (`Emu3`), the streaming core under every image front end, understanding,
input checks, VQ decoding and results."""
