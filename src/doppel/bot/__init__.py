"""`doppel bot`: the persona in Telegram, through a bot of the owner's (python-telegram-bot)."""
